//! The products of a prefill batch as register-tiled kernels on AVX-512, x86-64 only: the down
//! projection (`out = h @ D`, `D` stored one row per neuron) for every weight type, and
//! `x @ W^T` for f16 and f32 weights ([`dot_rows_tiled`]; block-quantised `W` goes through the
//! integer kernels of [`qdot`]).
//!
//! The other paths of [`matmul_down`](super::matmul::matmul_down) add one weight row at a time
//! into each input's output row in memory (`axpy`): every multiply-add loads and stores its
//! output, so a batch runs at a fraction of the multiply-add throughput (about 45 GFLOP/s per
//! thread on the test machine at 64 inputs). Here, for each [`DOWN_GROUP`] of rows and each
//! block of [`QK`] output columns, the rows' piece is widened (dequantised) once into a panel of
//! f32 (32 KB, in L1/L2), and [`TILE_T`] inputs by 32 columns are accumulated in 16 vector
//! registers over the group's rows: per row two weight vectors, eight broadcast coefficients,
//! sixteen multiply-adds, no output traffic.
//!
//! Every output is the same sequence of f32 operations as in the other paths, so the result is
//! bitwise theirs (and the one-input decode's): within a group, `p = madd(p, h[r], D[r])` for
//! `r` increasing from `p = 0` ([`madd`](super::dot::madd): fused when [`FUSED`]); the first
//! group's `p` is the output, each later one is added to it in group order. The weights are
//! widened exactly (f16 by `vcvtph2ps`, blocks as [`crate::quant::decode_blocks`] does:
//! `d * q`, plus `m` for `q4_1`).

use std::arch::x86_64::*;

use super::dot::{madd, reduce, FUSED, LANES};
use super::matmul::DOWN_GROUP;
use super::qdot;
use crate::cpu::weights::{Matrix, RowData};
use crate::format::{DType, QK};

/// Inputs per register tile: `TILE_T` inputs by two 16-lane vectors are 16 accumulators, half
/// the AVX-512 register file, leaving room for the two weight vectors and the broadcasts.
pub(super) const TILE_T: usize = 8;

/// Inputs per register tile on AVX2 (16 vector registers): `TILE_T2` inputs by two 8-lane
/// vectors (16 columns) are 12 accumulators, leaving two weight vectors and a broadcast.
pub(super) const TILE_T2: usize = 6;

/// Whether the tiled down projection runs on this CPU for an output `cols` wide (AVX-512 F/BW/VL
/// with AVX2, FMA and F16C, or AVX2, FMA and F16C alone; whole blocks of 32 columns).
pub(super) fn applies(cols: usize) -> bool {
    cols.is_multiple_of(QK) && (qdot::x86::has_avx512() || qdot::x86::available())
}

/// Columns `[c0, c1)` of `h @ D` for `t` inputs (`h` is `[t, d.rows]`): output `(i, c)` goes
/// to `out[i * ld + c - c0]`. Requires [`applies`]`(d.cols)`, `c0` and `c1` multiples of 32 with
/// `c1 <= d.cols`, `ld >= c1 - c0`; does nothing otherwise (checked).
pub(super) fn down_tiled(h: &[f32], t: usize, d: &Matrix<'_>, c0: usize, c1: usize, out: &mut [f32], ld: usize) {
    let (rows, n) = (d.rows, d.cols);
    let fits = applies(n)
        && c0.is_multiple_of(QK)
        && c1.is_multiple_of(QK)
        && c0 <= c1
        && c1 <= n
        && ld >= c1 - c0
        && h.len() >= t * rows
        && (t == 0 || out.len() >= (t - 1) * ld + (c1 - c0));
    if !fits || t == 0 {
        return;
    }
    let mut panel = vec![0.0f32; DOWN_GROUP * QK];
    let wide = qdot::x86::has_avx512();
    for g in 0..rows.div_ceil(DOWN_GROUP).max(1) {
        let (r0, r1) = (g * DOWN_GROUP, ((g + 1) * DOWN_GROUP).min(rows));
        let k = r1 - r0;
        let mut c = c0;
        while c < c1 {
            pack(d, r0, r1, c, &mut panel[..k * QK], wide);
            if !wide {
                // AVX2: each half of the block's 32 columns by TILE_T2 inputs at a time.
                for half in 0..2 {
                    let mut i = 0;
                    while i < t {
                        let tt = (t - i).min(TILE_T2);
                        let hp = &h[i * rows + r0..];
                        let op = &mut out[i * ld + (c - c0) + 2 * LANES2 * half..];
                        let pp = &panel[half * 2 * LANES2..k * QK];
                        macro_rules! tile2 {
                            ($n:literal) => {
                                // SAFETY: `applies` checked AVX2, FMA and F16C; `pp` holds `k`
                                // panel rows of 32 values from column `16 * half` on (the last
                                // one 32 - 16 * half values, of which 16 are read); `hp` holds
                                // `tt` inputs' rows `[r0, r1)` at stride `rows`; `op` holds
                                // `tt` rows of at least 16 values at stride `ld` (`out.len()`
                                // checked above, `c + 32 <= c1`).
                                unsafe { tile2::<$n>(pp, k, hp, rows, op, ld, g == 0) }
                            };
                        }
                        match tt {
                            6 => tile2!(6),
                            5 => tile2!(5),
                            4 => tile2!(4),
                            3 => tile2!(3),
                            2 => tile2!(2),
                            _ => tile2!(1),
                        }
                        i += tt;
                    }
                }
                c += QK;
                continue;
            }
            let mut i = 0;
            while i < t {
                let tt = (t - i).min(TILE_T);
                let hp = &h[i * rows + r0..];
                let op = &mut out[i * ld + (c - c0)..];
                macro_rules! tile {
                    ($n:literal) => {
                        // SAFETY: `applies` checked AVX-512 F and FMA; the panel holds `k` rows of
                        // 32 values; `hp` holds `tt` inputs' rows `[r0, r1)` at stride `rows`
                        // (`h.len() >= t * rows`, `i + tt <= t`); `op` holds `tt` rows of 32
                        // values at stride `ld` (`out.len()` checked above).
                        unsafe { tile::<$n>(&panel[..k * QK], k, hp, rows, op, ld, g == 0) }
                    };
                }
                match tt {
                    8 => tile!(8),
                    7 => tile!(7),
                    6 => tile!(6),
                    5 => tile!(5),
                    4 => tile!(4),
                    3 => tile!(3),
                    2 => tile!(2),
                    _ => tile!(1),
                }
                i += tt;
            }
            c += QK;
        }
    }
}

/// Rows `[r0, r1)`, columns `[c, c + 32)` of `d`, widened exactly into `panel` (32 values per
/// row), with AVX-512 when `wide`, else AVX2. Rows a part does not hold stay zero.
fn pack(d: &Matrix<'_>, r0: usize, r1: usize, c: usize, panel: &mut [f32], wide: bool) {
    let n = d.cols;
    panel.fill(0.0);
    for (start, rows, data) in d.parts_in(r0, r1) {
        for j in 0..rows {
            let k = start - r0 + j;
            let Some(dst) = panel.get_mut(k * QK..(k + 1) * QK) else { return };
            match data.get(j * n + c, j * n + c + QK) {
                Some(RowData::Quant(dtype, blk)) if blk.len() == dtype.block_bytes() && wide => {
                    // SAFETY: `applies` and `wide` checked AVX-512 F/BW with F16C; `blk` is one
                    // whole block of `dtype` and `dst` holds 32 values.
                    unsafe { decode_block(dtype, blk, dst) }
                }
                Some(RowData::Quant(dtype, blk)) if blk.len() == dtype.block_bytes() => {
                    // SAFETY: `applies` checked AVX2 and F16C; `blk` is one whole block of
                    // `dtype` and `dst` holds 32 values.
                    unsafe { decode_block2(dtype, blk, dst) }
                }
                Some(piece) => piece.widen_into(dst),
                None => {}
            }
        }
    }
}

/// One block of `dtype` widened into 32 values, the operations of
/// [`crate::quant::decode_blocks`] on 16 lanes.
///
/// Safety: AVX-512 F/BW/VL and F16C are available; `blk` is one whole block, `dst` 32 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn decode_block(dtype: DType, blk: &[u8], dst: &mut [f32]) {
    let bb = dtype.block_bytes();
    debug_assert!(blk.len() >= bb && dst.len() >= QK);
    let f16 = |at: usize| half::f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
    let d = _mm512_set1_ps(f16(0));
    let p = blk.as_ptr();
    // SAFETY: reads of `blk[2 .. bb]` (16 or 32 bytes at `bb - 16` or 2) and writes of
    // `dst[0 .. 32]`, inside the lengths checked by the caller; the rest are register intrinsics.
    unsafe {
        let (q, m): ([__m512i; 2], Option<__m512>) = match dtype {
            DType::Q8_0 => (
                [
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast())),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast())),
                ],
                None,
            ),
            _ => {
                let raw = _mm_loadu_si128(p.add(bb - QK / 2).cast());
                let nib = _mm_set1_epi8(0x0f);
                let q = [
                    _mm512_cvtepu8_epi32(_mm_and_si128(raw, nib)),
                    _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), nib)),
                ];
                if dtype == DType::Q4_1 {
                    (q, Some(_mm512_set1_ps(f16(2))))
                } else {
                    let eight = _mm512_set1_epi32(8);
                    (q.map(|q| _mm512_sub_epi32(q, eight)), None)
                }
            }
        };
        for (h, qh) in q.iter().enumerate() {
            let mut w = _mm512_mul_ps(d, _mm512_cvtepi32_ps(*qh));
            if let Some(m) = m {
                w = _mm512_add_ps(w, m);
            }
            _mm512_storeu_ps(dst.as_mut_ptr().add(16 * h), w);
        }
    }
}

/// [`decode_block`] on AVX2: the operations of [`crate::quant::decode_blocks`] on 8 lanes.
///
/// Safety: AVX2 and F16C are available; `blk` is one whole block, `dst` 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_block2(dtype: DType, blk: &[u8], dst: &mut [f32]) {
    let bb = dtype.block_bytes();
    debug_assert!(blk.len() >= bb && dst.len() >= QK);
    let f16 = |at: usize| half::f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32();
    let d = _mm256_set1_ps(f16(0));
    let m = if dtype == DType::Q4_1 { Some(_mm256_set1_ps(f16(2))) } else { None };
    let p = blk.as_ptr();
    // SAFETY: reads of `blk[2 .. bb]` (16 or 32 bytes at `bb - 16` or 2) and writes of
    // `dst[0 .. 32]`, inside the lengths checked by the caller; the rest are register intrinsics.
    unsafe {
        let q: [__m256i; 4] = match dtype {
            DType::Q8_0 => std::array::from_fn(|j| _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(2 + 8 * j).cast()))),
            _ => {
                let raw = _mm_loadu_si128(p.add(bb - QK / 2).cast());
                let nib = _mm_set1_epi8(0x0f);
                let (lo, hi) = (_mm_and_si128(raw, nib), _mm_and_si128(_mm_srli_epi16(raw, 4), nib));
                let q = [
                    _mm256_cvtepu8_epi32(lo),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                    _mm256_cvtepu8_epi32(hi),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
                ];
                if dtype == DType::Q4_0 {
                    let eight = _mm256_set1_epi32(8);
                    q.map(|q| _mm256_sub_epi32(q, eight))
                } else {
                    q
                }
            }
        };
        for (j, qj) in q.iter().enumerate() {
            let mut w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(*qj));
            if let Some(m) = m {
                w = _mm256_add_ps(w, m);
            }
            _mm256_storeu_ps(dst.as_mut_ptr().add(8 * j), w);
        }
    }
}

/// Lanes of an AVX2 vector of f32.
const LANES2: usize = 8;

/// [`tile`] on AVX2 for 16 columns: `N` inputs by 16 columns over `k` panel rows (stride 32,
/// starting at `panel[0]`): `p[i] = madd(p[i], h[i * hw + r], panel[r * 32 .. r * 32 + 16])`
/// for `r` increasing from zero, then `out[i][..16] = p[i]` (`first`) or `out + p`.
///
/// Safety: AVX2 and FMA are available; `panel` holds `(k - 1) * 32 + 16` values, `h` holds
/// `(N - 1) * hw + k` values, `out` holds `(N - 1) * ld + 16`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile2<const N: usize>(
    panel: &[f32],
    k: usize,
    h: &[f32],
    hw: usize,
    out: &mut [f32],
    ld: usize,
    first: bool,
) {
    debug_assert!(
        k == 0
            || (panel.len() >= (k - 1) * QK + 2 * LANES2
                && h.len() >= (N - 1) * hw + k
                && out.len() >= (N - 1) * ld + 2 * LANES2)
    );
    let (pp, hp, op) = (panel.as_ptr(), h.as_ptr(), out.as_mut_ptr());
    // SAFETY: reads of `panel[r * 32 .. r * 32 + 16]` and `h[i * hw + r]` for `r < k`,
    // `i < N`, reads and writes of `out[i * ld .. i * ld + 16]`: inside the lengths the caller
    // guarantees. The rest are register intrinsics.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for r in 0..k {
            let w = [_mm256_loadu_ps(pp.add(r * QK)), _mm256_loadu_ps(pp.add(r * QK + LANES2))];
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*hp.add(i * hw + r));
                for (av, wv) in a.iter_mut().zip(w) {
                    *av = if FUSED { _mm256_fmadd_ps(x, wv, *av) } else { _mm256_add_ps(*av, _mm256_mul_ps(x, wv)) };
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let o = op.add(i * ld);
            for (j, av) in a.iter().enumerate() {
                let v = if first { *av } else { _mm256_add_ps(_mm256_loadu_ps(o.add(LANES2 * j)), *av) };
                _mm256_storeu_ps(o.add(LANES2 * j), v);
            }
        }
    }
}

/// `N` inputs by 32 columns over `k` panel rows: `p[i] = madd(p[i], h[i * hw + r], panel[r])`
/// for `r` increasing from zero, then `out[i] = p[i]` (`first`) or `out[i] = out[i] + p[i]`.
///
/// Safety: AVX-512 F and FMA are available; `panel` holds `k * 32` values, `h` holds
/// `(N - 1) * hw + k` values, `out` holds `(N - 1) * ld + 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile<const N: usize>(panel: &[f32], k: usize, h: &[f32], hw: usize, out: &mut [f32], ld: usize, first: bool) {
    debug_assert!(panel.len() >= k * QK && h.len() >= (N - 1) * hw + k && out.len() >= (N - 1) * ld + QK);
    let (pp, hp, op) = (panel.as_ptr(), h.as_ptr(), out.as_mut_ptr());
    // SAFETY: reads of `panel[r * 32 .. r * 32 + 32]` and `h[i * hw + r]` for `r < k`,
    // `i < N`, reads and writes of `out[i * ld .. i * ld + 32]`: inside the lengths the caller
    // guarantees. The rest are register intrinsics.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for r in 0..k {
            let w = [_mm512_loadu_ps(pp.add(r * QK)), _mm512_loadu_ps(pp.add(r * QK + 16))];
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*hp.add(i * hw + r));
                for (av, wv) in a.iter_mut().zip(w) {
                    *av = if FUSED { _mm512_fmadd_ps(x, wv, *av) } else { _mm512_add_ps(*av, _mm512_mul_ps(x, wv)) };
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let o = op.add(i * ld);
            for (h, av) in a.iter().enumerate() {
                let v = if first { *av } else { _mm512_add_ps(_mm512_loadu_ps(o.add(16 * h)), *av) };
                _mm512_storeu_ps(o.add(16 * h), v);
            }
        }
    }
}

/// Weight rows per register tile of the batched `x @ W^T` on widened rows.
pub(super) const DOT_ROWS: usize = 4;
/// Inputs per register tile of the batched `x @ W^T`: [`DOT_ROWS`] x `DOT_TOKENS` dot
/// products of [`LANES`] lanes each are 24 of the 32 vector registers.
pub(super) const DOT_TOKENS: usize = 3;
/// From this many inputs on, batched f16 and f32 products take [`dot_rows_tiled`] (below it
/// the products read more weights than they compute, and widening every row first measured
/// slower: small_batch_speed f16 8192 x 2048, one thread, 5 inputs 28.7-32.7 -> 28.8-30.2
/// GFLOP/s, 8 inputs 33.6-34.2 -> 41.1-41.7, 64 inputs 42.3-43.0 -> 80.5-84.2).
pub(super) const DOT_MIN_T: usize = 8;

/// Whether [`dot_rows_tiled`] runs on this CPU (AVX-512 F/BW/VL with AVX2, FMA and F16C, or
/// AVX2, FMA and F16C alone).
pub(super) fn dot_applies() -> bool {
    qdot::x86::has_avx512() || qdot::x86::available()
}

/// `out[i * ld + r] = x[i] . W[r]` for `t` inputs (`x` is `[t, cols]`) and the `rows` rows of
/// `data` (f16, f32 or blocks), each row widened exactly once into `wbuf`, then [`DOT_ROWS`]
/// rows by [`DOT_TOKENS`] inputs accumulated in registers. Each product is [`dot`]'s sequence
/// of operations (element `k` into lane `k % LANES` by [`madd`] in increasing `k`, the lanes
/// summed by [`reduce`]), so the results are bitwise the other paths'. Does nothing unless
/// [`dot_applies`] (checked).
///
/// [`dot`]: super::dot::dot
/// [`madd`]: super::dot::madd
/// [`reduce`]: super::dot::reduce
#[allow(clippy::too_many_arguments)]
pub(super) fn dot_rows_tiled(
    x: &[f32],
    t: usize,
    data: RowData<'_>,
    rows: usize,
    cols: usize,
    out: &mut [f32],
    ld: usize,
    wbuf: &mut Vec<f32>,
) {
    let fits = dot_applies()
        && x.len() >= t * cols
        && (t == 0 || rows == 0 || (ld >= rows && out.len() >= (t - 1) * ld + rows));
    if !fits {
        return;
    }
    wbuf.clear();
    wbuf.resize(DOT_ROWS * cols, 0.0);
    let wide = qdot::x86::has_avx512();
    let mut k = 0;
    while k < rows {
        let nr = (rows - k).min(DOT_ROWS);
        if let Some(block) = data.get(k * cols, (k + nr) * cols) {
            block.widen_into(&mut wbuf[..nr * cols]);
        }
        let mut i = 0;
        while i < t {
            let nt = (t - i).min(DOT_TOKENS);
            let (w, xs) = (&wbuf[..nr * cols], &x[i * cols..(i + nt) * cols]);
            let o = &mut out[i * ld + k..];
            macro_rules! go {
                ($r:literal, $t:literal) => {{
                    let acc = if wide {
                        // SAFETY: `dot_applies` and `wide` checked AVX-512; `w` holds `$r` rows
                        // and `xs` `$t` inputs of `cols` values (sliced above).
                        unsafe { dot_tile::<$r, $t>(w, xs, cols) }
                    } else {
                        // SAFETY: `dot_applies` checked AVX2, FMA and F16C; the lengths as above.
                        unsafe { dot_tile2::<$r, $t>(w, xs, cols) }
                    };
                    dot_finish(&acc, w, xs, cols, o, ld)
                }};
            }
            match (nr, nt) {
                (4, 3) => go!(4, 3),
                (4, 2) => go!(4, 2),
                (4, _) => go!(4, 1),
                (3, 3) => go!(3, 3),
                (3, 2) => go!(3, 2),
                (3, _) => go!(3, 1),
                (2, 3) => go!(2, 3),
                (2, 2) => go!(2, 2),
                (2, _) => go!(2, 1),
                (_, 3) => go!(1, 3),
                (_, 2) => go!(1, 2),
                (_, _) => go!(1, 1),
            }
            i += nt;
        }
        k += nr;
    }
}

/// The tail elements (past the last whole [`LANES`] chunk) added to the lanes, then the lanes
/// summed, for every (row, input) of a tile: `o[q * ld + j]` for row `j`, input `q`.
fn dot_finish<const R: usize, const T: usize>(
    acc: &[[[f32; LANES]; T]; R],
    w: &[f32],
    xs: &[f32],
    cols: usize,
    o: &mut [f32],
    ld: usize,
) {
    let full = cols - cols % LANES;
    for (j, aj) in acc.iter().enumerate() {
        let wt = &w[j * cols + full..(j + 1) * cols];
        for (q, a) in aj.iter().enumerate() {
            let mut a = *a;
            let xt = &xs[q * cols + full..(q + 1) * cols];
            for ((s, xv), wv) in a.iter_mut().zip(xt).zip(wt) {
                *s = madd(*s, *xv, *wv);
            }
            o[q * ld + j] = reduce(&a);
        }
    }
}

/// The [`LANES`]-lane accumulators of `R` rows (`w`, `R * cols` values) by `T` inputs (`xs`,
/// `T * cols` values) over the whole chunks of `cols`: lane `l` of `(j, q)` is
/// `madd(.., xs[q][c + l], w[j][c + l])` for `c` stepping by [`LANES`] from zero.
///
/// Safety: AVX-512 F/BW/VL, AVX2, FMA and F16C are available; `w` and `xs` hold `R * cols`
/// and `T * cols` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dot_tile<const R: usize, const T: usize>(w: &[f32], xs: &[f32], cols: usize) -> [[[f32; LANES]; T]; R] {
    const { assert!(LANES == 32) };
    debug_assert!(w.len() >= R * cols && xs.len() >= T * cols);
    let full = cols - cols % LANES;
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    let mut out = [[[0.0f32; LANES]; T]; R];
    // SAFETY: reads of `w[j * cols + c .. + 32]` and `xs[q * cols + c .. + 32]` for `c + 32 <=
    // full <= cols`, `j < R`, `q < T`; writes into `out`'s arrays of 32; the rest are register
    // intrinsics.
    unsafe {
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        let mut c = 0;
        while c < full {
            let xv: [[__m512; 2]; T] = std::array::from_fn(|q| {
                let p = xp.add(q * cols + c);
                [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
            });
            for (j, aj) in acc.iter_mut().enumerate() {
                let p = wp.add(j * cols + c);
                let wv = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
                for (a, xq) in aj.iter_mut().zip(&xv) {
                    for h in 0..2 {
                        a[h] = if FUSED {
                            _mm512_fmadd_ps(xq[h], wv[h], a[h])
                        } else {
                            _mm512_add_ps(a[h], _mm512_mul_ps(xq[h], wv[h]))
                        };
                    }
                }
            }
            c += LANES;
        }
        for (oj, aj) in out.iter_mut().zip(&acc) {
            for (oq, a) in oj.iter_mut().zip(aj) {
                _mm512_storeu_ps(oq.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(oq.as_mut_ptr().add(16), a[1]);
            }
        }
    }
    out
}

/// Columns per pass of [`dot_tile2`]: the tile's rows and inputs over this many columns
/// (14 KB for 4 rows by 3 inputs) stay in L1 while the four quarters of the lanes go by
/// (small_batch_speed f16 8192 x 2048, 64 inputs, one thread: 256 columns 29.7-30.2 GFLOP/s,
/// 512 columns 35.1-40.1, 1024 columns 28.0-38.2).
const DOT_CHUNK2: usize = 16 * LANES;

/// [`dot_tile`] on AVX2 (16 vector registers): the same lanes, a quarter of them (8) at a time,
/// so that `R * T` accumulators of one vector each stay in registers; the columns go by in
/// chunks of [`DOT_CHUNK2`], each taken for the four quarters in turn (the accumulators kept
/// in the output between chunks), so each lane's multiply-adds are still in column order.
///
/// Safety: AVX2, FMA and F16C are available; `w` and `xs` hold `R * cols` and `T * cols`
/// values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tile2<const R: usize, const T: usize>(w: &[f32], xs: &[f32], cols: usize) -> [[[f32; LANES]; T]; R] {
    const { assert!(LANES == 32) };
    debug_assert!(w.len() >= R * cols && xs.len() >= T * cols);
    let full = cols - cols % LANES;
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    let mut out = [[[0.0f32; LANES]; T]; R];
    // SAFETY: reads of `w[j * cols + c + 8 * quarter .. + 8]` and `xs[q * cols + c + 8 *
    // quarter .. + 8]` for `c + 32 <= full <= cols`, `quarter < 4`, `j < R`, `q < T`; reads
    // and writes of `out`'s arrays of 32 at `8 * quarter .. + 8`; the rest are register
    // intrinsics.
    unsafe {
        let mut c0 = 0;
        while c0 < full {
            let c1 = (c0 + DOT_CHUNK2).min(full);
            for quarter in 0..LANES / LANES2 {
                let at = LANES2 * quarter;
                let mut acc: [[__m256; T]; R] =
                    std::array::from_fn(|j| std::array::from_fn(|q| _mm256_loadu_ps(out[j][q].as_ptr().add(at))));
                let mut c = c0;
                while c < c1 {
                    let xv: [__m256; T] = std::array::from_fn(|q| _mm256_loadu_ps(xp.add(q * cols + c + at)));
                    for (j, aj) in acc.iter_mut().enumerate() {
                        let wv = _mm256_loadu_ps(wp.add(j * cols + c + at));
                        for (a, xq) in aj.iter_mut().zip(&xv) {
                            *a = if FUSED {
                                _mm256_fmadd_ps(*xq, wv, *a)
                            } else {
                                _mm256_add_ps(*a, _mm256_mul_ps(*xq, wv))
                            };
                        }
                    }
                    c += LANES;
                }
                for (oj, aj) in out.iter_mut().zip(&acc) {
                    for (oq, a) in oj.iter_mut().zip(aj) {
                        _mm256_storeu_ps(oq.as_mut_ptr().add(at), *a);
                    }
                }
            }
            c0 = c1;
        }
    }
    out
}
