//! Matrix products against weight matrices read in place: `x @ W^T` (projections, LM head)
//! and the down projection `h @ D` (stored transposed, one row per neuron).

use super::dot::*;
use super::pool::*;
use super::qdot::{self, QActs};
use crate::cpu::weights::{Matrix, RowData};
#[cfg(target_arch = "x86_64")]
use crate::format::QK;

/// Rows by inputs per call of the AVX-512 quantised kernel in a batch (see `quant_rows`).
#[cfg(target_arch = "x86_64")]
const AVX512_ROWS: usize = 4;
#[cfg(target_arch = "x86_64")]
const AVX512_TOKENS: usize = 4;

/// Rows per call of the AVX2 quantised kernel in a batch (see `quant_rows`).
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = qdot::x86::ROWS;

/// Rows per group of the token-lane kernel ([`super::qlanes`]), and chunks of 16 tokens per
/// pass over a group (against every chunk per row: small_batch_speed q4_0 8192 x 2048, 64
/// inputs, one thread 124 -> 132 GFLOP/s, two threads 172 -> 176).
#[cfg(target_arch = "x86_64")]
const LANE_ROWS: usize = 64;
#[cfg(target_arch = "x86_64")]
const LANE_CHUNKS: usize = 2;
/// Chunks of 8 tokens per pass of the AVX2 token-lane kernel over a group: each call unpacks
/// its row once for all of them (small_batch_speed's token_lane_speed, q4_0 8192 x 2048, 64
/// inputs, two runs each, one thread: 2 chunks 1.40-1.49x the row-by-token kernels, 4 chunks
/// 1.29-1.53x, 8 chunks 1.63x).
#[cfg(target_arch = "x86_64")]
const LANE_CHUNKS2: usize = 8;

/// Rows widened at a time in the batched paths.
pub(super) const ROW_BLOCK: usize = 8;

/// Rows `[r0, r1)` of `x @ W^T` for `t` inputs: `out[i * ld + (r - r0)] = x[i] . W[r]`;
/// `xs` is [`prescale`]`(x)` when `t == 1` and it exists; `qx` is `x` quantised to 8 bits
/// ([`QActs::quantize`]) when `W` is block-quantised (then the integer kernels are used).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_rows(
    x: &[f32],
    xs: Option<&[f32]>,
    qx: Option<&QActs>,
    t: usize,
    w: &Matrix<'_>,
    r0: usize,
    r1: usize,
    out: &mut [f32],
    ld: usize,
) {
    let cols = w.cols;
    if let Some(qx) = qx.filter(|_| w.parts.iter().all(|p| p.data.is_quant())) {
        quant_rows(qx, t, w, r0, r1, out, ld);
        return;
    }
    if t == 1 {
        let x = &x[..cols];
        for (start, rows, data) in w.parts_in(r0, r1) {
            for k in 0..rows {
                if let Some(row) = data.get(k * cols, (k + 1) * cols) {
                    out[start - r0 + k] = dot_row(x, xs, row);
                }
            }
        }
        return;
    }
    let mut wbuf = Vec::new();
    for (start, rows, data) in w.parts_in(r0, r1) {
        #[cfg(target_arch = "x86_64")]
        if t >= super::tiled::DOT_MIN_T && super::tiled::dot_applies() {
            // AVX-512 or AVX2: register tiles of rows by inputs on widened rows (the same bits).
            super::tiled::dot_rows_tiled(x, t, data, rows, cols, &mut out[start - r0..], ld, &mut wbuf);
            continue;
        }
        if let RowData::F16(rows_f16) = data {
            // Each row read once and widened in registers, dotted with every input while in L1.
            for (k, row) in rows_f16.chunks_exact(cols.max(1)).take(rows).enumerate() {
                dot_many_f16(&x[..t * cols], t, row, &mut out[start - r0 + k..], ld);
            }
            continue;
        }
        wbuf.resize(ROW_BLOCK * cols, 0.0);
        let mut b0 = 0;
        while b0 < rows {
            let nb = ROW_BLOCK.min(rows - b0);
            if let Some(block) = data.get(b0 * cols, (b0 + nb) * cols) {
                block.widen_into(&mut wbuf[..nb * cols]);
            }
            let col0 = start - r0 + b0;
            let mut i = 0;
            while i + TOKEN_BLOCK <= t {
                let xs: [&[f32]; TOKEN_BLOCK] = std::array::from_fn(|q| &x[(i + q) * cols..(i + q + 1) * cols]);
                for (j, wr) in wbuf[..nb * cols].chunks_exact(cols).enumerate() {
                    let mut acc = [[0.0f32; LANES]; TOKEN_BLOCK];
                    accumulate_block(&mut acc, xs, wr);
                    for (ti, a) in acc.iter().enumerate() {
                        out[(i + ti) * ld + col0 + j] = reduce(a);
                    }
                }
                i += TOKEN_BLOCK;
            }
            for ti in i..t {
                let xr = &x[ti * cols..(ti + 1) * cols];
                for (j, wr) in wbuf[..nb * cols].chunks_exact(cols).enumerate() {
                    out[ti * ld + col0 + j] = dot(xr, wr);
                }
            }
            b0 += nb;
        }
    }
}

/// [`matmul_rows`] for a block-quantised `W`: every `(token, row)` is one integer
/// [`qdot::dot`] of the row's blocks with the token's quantised activation, whatever `t`, so a
/// prefill batch and one-token decodes give the same bits. Rows are taken [`ROW_BLOCK`] at a
/// time and used for every token while they are in the cache.
fn quant_rows(qx: &QActs, t: usize, w: &Matrix<'_>, r0: usize, r1: usize, out: &mut [f32], ld: usize) {
    for (start, rows, data) in w.parts_in(r0, r1) {
        let RowData::Quant(dtype, bytes) = data else { continue };
        let rb = bytes.len() / rows.max(1);
        let col0 = start - r0;
        #[cfg(target_arch = "x86_64")]
        if t == 1 && qdot::x86::available() {
            // One token: ROWS rows at a time share each activation block.
            const R: usize = qdot::x86::ROWS;
            let x = qx.token(0);
            let mut k = 0;
            while k + R <= rows {
                let w: [&[u8]; R] = std::array::from_fn(|j| &bytes[(k + j) * rb..(k + j + 1) * rb]);
                let r = qdot::x86::dot_rows(dtype, w, x);
                out[col0 + k..col0 + k + R].copy_from_slice(&r);
                k += R;
            }
            for k in k..rows {
                out[col0 + k] = qdot::dot(dtype, &bytes[k * rb..(k + 1) * rb], x);
            }
            continue;
        }
        // Tokens already done by the token-lane kernel (AVX-512 VNNI, from 16 tokens).
        #[cfg(target_arch = "x86_64")]
        let i0 = match qx.lanes() {
            Some(lanes) if lanes.tokens() <= t && super::qlanes::applies(dtype, rb, lanes) => {
                // Groups of rows that stay in L2, each taken against LANE_CHUNKS chunks of
                // tokens at a time (their activations in L1).
                let mut g0 = 0;
                while g0 < rows {
                    let g1 = (g0 + LANE_ROWS).min(rows);
                    let mut c = 0;
                    let step = if lanes.width() == super::qlanes::LANES_T { LANE_CHUNKS } else { LANE_CHUNKS2 };
                    while c < lanes.chunks() {
                        for k in g0..g1 {
                            let o = &mut *out;
                            super::qlanes::dot_lanes(
                                dtype,
                                &bytes[k * rb..(k + 1) * rb],
                                lanes,
                                c..c + step,
                                |i, v| {
                                    o[i * ld + col0 + k] = v;
                                },
                            );
                        }
                        c += step;
                    }
                    g0 = g1;
                }
                lanes.tokens()
            }
            _ => 0,
        };
        #[cfg(target_arch = "x86_64")]
        if i0 == t {
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if t > 1 && qdot::x86::has_avx512() {
            // Several tokens on AVX-512 (32 vector registers): four rows by four tokens at a
            // time, so each activation block loaded serves four rows and each weight block
            // four tokens (measured against 2 x 4, 4 x 3 and 2 x 6: small_batch_speed q4_0
            // 8192 x 2048, 64 inputs, 78-79 -> 89-91 GFLOP/s on one thread).
            let row = |k: usize| &bytes[k * rb..(k + 1) * rb];
            let mut k = 0;
            while k + AVX512_ROWS <= rows {
                let w: [&[u8]; AVX512_ROWS] = std::array::from_fn(|j| row(k + j));
                // Four tokens at a time, leaving 3 + 2 rather than 4 + 1 (measured cheaper).
                let n = t - i0;
                let quads_end = if n % AVX512_TOKENS == 1 && n > AVX512_TOKENS { t - 5 } else { t };
                let mut i = i0;
                while i + AVX512_TOKENS <= quads_end {
                    let r = qdot::x86::dot_block::<AVX512_ROWS, AVX512_TOKENS>(
                        dtype,
                        w,
                        std::array::from_fn(|q| qx.token(i + q)),
                    );
                    for (j, rj) in r.iter().enumerate() {
                        for (q, v) in rj.iter().enumerate() {
                            out[(i + q) * ld + col0 + k + j] = *v;
                        }
                    }
                    i += AVX512_TOKENS;
                }
                // The last one to three tokens in one call (a verify pass of 2 to 7 tokens, a
                // prefill's tail), or five in two: each weight block decoded once per call.
                macro_rules! rest {
                    ($n:literal) => {{
                        let r =
                            qdot::x86::dot_block::<AVX512_ROWS, $n>(dtype, w, std::array::from_fn(|q| qx.token(i + q)));
                        for (j, rj) in r.iter().enumerate() {
                            for (q, v) in rj.iter().enumerate() {
                                out[(i + q) * ld + col0 + k + j] = *v;
                            }
                        }
                    }};
                }
                match t - i {
                    5 => {
                        rest!(3);
                        i += 3;
                        rest!(2);
                    }
                    3 => rest!(3),
                    2 => rest!(2),
                    1 => rest!(1),
                    _ => {}
                }
                k += AVX512_ROWS;
            }
            while k < rows {
                for i in i0..t {
                    out[i * ld + col0 + k] = qdot::dot(dtype, row(k), qx.token(i));
                }
                k += 1;
            }
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if t > 1 && qdot::x86::available() {
            // Several tokens on AVX2 (16 vector registers): four rows at a time (in L1 while
            // the tokens go by), q8_0 two tokens per call, the 4-bit types one. Measured on
            // an AVX2-only AMD EPYC (Zen 3), 48 rows of 2048 in L2 against 12 tokens, ns per
            // (row, token, block): q4_0 4 x 1 1.79, 4 x 2 2.08, 1 x 4 (the former
            // `dot_tokens`) 2.23, 2 x 2 2.31; q8_0 4 x 2 1.54, 2 x 2 1.56, 4 x 1 1.98, 1 x 4
            // 1.95. (With the type's lane-0 offset and scale per token, the 4-bit tiles
            // spend more per token than they save on unpacking.)
            let row = |k: usize| &bytes[k * rb..(k + 1) * rb];
            let pair = dtype == crate::format::DType::Q8_0;
            let mut k = 0;
            while k + AVX2_ROWS <= rows {
                let w: [&[u8]; AVX2_ROWS] = std::array::from_fn(|j| row(k + j));
                let mut i = i0;
                while pair && i + 2 <= t {
                    let r = qdot::x86::dot_block::<AVX2_ROWS, 2>(dtype, w, [qx.token(i), qx.token(i + 1)]);
                    for (j, rj) in r.iter().enumerate() {
                        out[i * ld + col0 + k + j] = rj[0];
                        out[(i + 1) * ld + col0 + k + j] = rj[1];
                    }
                    i += 2;
                }
                for i in i..t {
                    let r = qdot::x86::dot_rows(dtype, w, qx.token(i));
                    for (j, v) in r.into_iter().enumerate() {
                        out[i * ld + col0 + k + j] = v;
                    }
                }
                k += AVX2_ROWS;
            }
            for k in k..rows {
                for i in i0..t {
                    out[i * ld + col0 + k] = qdot::dot(dtype, row(k), qx.token(i));
                }
            }
            continue;
        }
        let mut b0 = 0;
        while b0 < rows {
            let nb = ROW_BLOCK.min(rows - b0);
            for k in b0..b0 + nb {
                qdot::dot_tokens(dtype, &bytes[k * rb..(k + 1) * rb], qx, t, &mut out[col0 + k..], ld);
            }
            b0 += nb;
        }
    }
}

/// `x` quantised for the integer kernels when `W` is block-quantised.
fn quantized_input(x: &[f32], t: usize, w: &Matrix<'_>) -> Option<QActs> {
    w.parts.iter().any(|p| p.data.is_quant()).then(|| QActs::quantize(x, t, w.cols))
}

/// `out[i, r] = x[i] . W[r]` for `t` inputs of `w.cols` elements: `x` is `[t, cols]`, `out`
/// is `[t, rows]`. Weight rows are read once for the whole batch.
pub(crate) fn matmul(x: &[f32], t: usize, w: &Matrix<'_>, out: &mut [f32], threads: usize) {
    let qx = quantized_input(x, t, w);
    matmul_with(x, qx.as_ref(), t, w, out, threads);
}

/// [`matmul`] with `x` already quantised (`qx`, for a block-quantised `w`).
fn matmul_with(x: &[f32], qx: Option<&QActs>, t: usize, w: &Matrix<'_>, out: &mut [f32], threads: usize) {
    debug_assert_eq!(x.len(), t * w.cols, "matmul input");
    debug_assert_eq!(out.len(), t * w.rows, "matmul output");
    let n = w.rows;
    let work = t.saturating_mul(n).saturating_mul(w.cols);
    let threads = threads_for(work, threads).min(n.div_ceil(ROW_BLOCK).max(1));
    let f16_rows = w.parts.iter().any(|p| matches!(p.data, RowData::F16(_)));
    let xs = if t == 1 && f16_rows && !HW_F16 { prescale(x) } else { None };
    let xs = xs.as_deref();
    let mut pieces = threads * ITEMS_PER_THREAD;
    if t == 1 {
        pieces = pieces.max(w.bytes() / ITEM_BYTES);
    }
    par_columns(out, t, n, threads, pieces, ROW_BLOCK, |s, e, chunk, ld| matmul_rows(x, xs, qx, t, w, s, e, chunk, ld));
}

/// [`matmul`] of one input against several matrices of the same width (`outs[i] = x @ W_i^T`):
/// a decode step's q, k and v projections, or its FFN gate and up. With one input the rows of
/// all the matrices are shared among the threads in one hand-off, so small products (k and v:
/// 512 x 2048 on the 1B model, below [`PAR_MIN_WORK`] alone) run on every thread and the step
/// waits for the workers once instead of once per matrix. Each output row is the same
/// [`dot_row`] as in [`matmul`], so the results are bitwise those of separate calls. With
/// several inputs (prefill, compute-bound) it is separate [`matmul`] calls, sharing one
/// quantisation of `x`.
pub(crate) fn matmul_many(x: &[f32], t: usize, products: &mut [(&Matrix<'_>, &mut [f32])], threads: usize) {
    let cols = products.first().map_or(0, |(w, _)| w.cols);
    if t != 1 || products.iter().any(|(w, _)| w.cols != cols) {
        let same = products.iter().all(|(w, _)| w.cols == cols);
        let shared = if same { products.iter().find_map(|(w, _)| quantized_input(x, t, w)) } else { None };
        for (w, out) in products.iter_mut() {
            match &shared {
                Some(qx) => matmul_with(x, Some(qx), t, w, out, threads),
                None => matmul(x, t, w, out, threads),
            }
        }
        return;
    }
    let x = &x[..cols.min(x.len())];
    let rows: usize = products.iter().map(|(w, _)| w.rows).sum();
    let threads = threads_for(rows.saturating_mul(cols), threads).min(rows.div_ceil(ROW_BLOCK).max(1));
    let f16_rows = products.iter().any(|(w, _)| w.parts.iter().any(|p| matches!(p.data, RowData::F16(_))));
    let xs = if f16_rows && !HW_F16 { prescale(x) } else { None };
    let xs = xs.as_deref();
    let quant = products.iter().any(|(w, _)| w.parts.iter().any(|p| p.data.is_quant()));
    let qx = quant.then(|| QActs::quantize(x, 1, cols));
    let qx = qx.as_ref();
    // Items of about ITEM_BYTES of weights (as stored), at least ITEMS_PER_THREAD per thread
    // over all the matrices, each within one matrix.
    let bytes: usize = products.iter().map(|(w, _)| w.bytes()).sum();
    let item_rows = (rows.saturating_mul(ITEM_BYTES) / bytes.max(1))
        .min(rows.div_ceil(threads * ITEMS_PER_THREAD))
        .div_ceil(ROW_BLOCK)
        .max(1)
        * ROW_BLOCK;
    let mut items = Vec::new();
    for (w, out) in products.iter_mut() {
        let w: &Matrix<'_> = w;
        let mut rest: &mut [f32] = &mut out[..w.rows];
        let mut s = 0;
        while s < w.rows {
            let e = (s + item_rows).min(w.rows);
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(e - s);
            rest = tail;
            items.push((w, s, e, chunk));
            s = e;
        }
    }
    run_dynamic(items, threads, |(w, s, e, chunk)| matmul_rows(x, xs, qx, 1, w, s, e, chunk, e - s));
}

/// Neurons per partial sum of the down projection. Fixed (not derived from the thread count
/// or the width) so that every output is the same sequence of operations whatever the batch,
/// the threads or the submodel: `out = ((p_0 + p_1) + p_2) + ...` where `p_g` sums neurons
/// `[g * DOWN_GROUP, (g + 1) * DOWN_GROUP)` in increasing order.
pub(super) const DOWN_GROUP: usize = 256;
/// From this many inputs on, the down projection runs register-tiled where the CPU has AVX-512
/// (`super::tiled`; the same bits, compute-bound).
#[cfg(target_arch = "x86_64")]
pub(super) const TILED_MIN_T: usize = 9;
/// Up to this many inputs the down projection splits neuron groups across threads (each
/// thread reads only its own weight rows); beyond it, it splits the inputs (compute-bound).
pub(super) const DOWN_SPLIT_GROUPS_MAX_T: usize = 8;

/// `out[i] = sum_{r in [r0, r1)} h[i, r] * D[r]` for `t` inputs (`h` is `[t, hw]`, `out` is
/// `[t, D.cols]`, zero on entry), `r` increasing.
#[allow(clippy::too_many_arguments)]
pub(super) fn down_rows(
    h: &[f32],
    hw: usize,
    t: usize,
    d: &Matrix<'_>,
    r0: usize,
    r1: usize,
    out: &mut [f32],
    wbuf: &mut Vec<f32>,
) {
    let n = d.cols;
    if t == 1 && d.parts.iter().all(|p| p.data.is_quant()) {
        // Quantised rows: decoded block by block in registers and added in order, bitwise
        // the exact path below.
        for (start, rows, data) in d.parts_in(r0, r1) {
            if let RowData::Quant(dtype, bytes) = data {
                qdot::axpy_quant_rows(dtype, &mut out[..n], &h[start..start + rows], bytes);
            }
        }
        return;
    }
    if t == 1 {
        // Quantised rows are dequantised (below); f16 and f32 rows are read in place.
        let quant = d.parts.iter().any(|p| p.data.is_quant());
        if !quant && down_one_fast(&h[..hw.min(h.len())], d, r0, r1, out) {
            return;
        }
        // Quantised rows, or a weight is infinite or NaN: start again from zero with exactly
        // widened (dequantised) weights.
        out.fill(0.0);
        // Four rows at a time, widened CONVERT_CHUNK columns at a time (the pieces and the
        // output chunk stay in L1).
        let chunk = CONVERT_CHUNK.min(n).max(1);
        wbuf.resize(4 * chunk, 0.0);
        for (start, rows, data) in d.parts_in(r0, r1) {
            let hrow = &h[start..start + rows];
            let mut j = 0;
            while j + 4 <= rows {
                let a = [hrow[j], hrow[j + 1], hrow[j + 2], hrow[j + 3]];
                let mut c0 = 0;
                while c0 < n {
                    let c1 = c0 + chunk.min(n - c0);
                    let m = c1 - c0;
                    for (q, b) in wbuf.chunks_exact_mut(chunk).enumerate() {
                        let base = (j + q) * n;
                        if let Some(piece) = data.get(base + c0, base + c1) {
                            piece.widen_into(&mut b[..m]);
                        }
                    }
                    let b = |q: usize| &wbuf[q * chunk..q * chunk + m];
                    axpy4(&mut out[c0..c1], a, [b(0), b(1), b(2), b(3)]);
                    c0 = c1;
                }
                j += 4;
            }
            for (j, &a) in hrow.iter().enumerate().skip(j) {
                let mut c0 = 0;
                while c0 < n {
                    let c1 = c0 + chunk.min(n - c0);
                    if let Some(piece) = data.get(j * n + c0, j * n + c1) {
                        piece.widen_into(&mut wbuf[..c1 - c0]);
                    }
                    axpy(&mut out[c0..c1], a, &wbuf[..c1 - c0]);
                    c0 = c1;
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if t <= DOWN_SPLIT_GROUPS_MAX_T && d.parts.iter().all(|p| p.data.is_quant()) && qdot::x86::available() {
        // A few inputs over quantised rows (a speculative verify pass): every row's block is
        // decoded once for all the inputs, whose outputs stay in registers; bitwise `t`
        // one-input passes (AVX-512, or AVX2 in groups of up to five inputs).
        let all = d.parts_in(r0, r1).all(|(start, rows, data)| match data {
            RowData::Quant(dtype, bytes) => qdot::x86::axpy_rows_multi(dtype, t, out, n, &h[start..], hw, bytes, rows),
            _ => false,
        });
        if all {
            return;
        }
        // Not taken (a shape the kernel does not cover): start again from zero below.
        out.fill(0.0);
    }
    if t <= DOWN_SPLIT_GROUPS_MAX_T && d.parts.iter().all(|p| matches!(p.data, RowData::F16(_))) {
        if down_many_f16(h, hw, t, d, r0, r1, out) {
            return;
        }
        // A weight is infinite or NaN: start again from zero with exactly widened weights.
        out.fill(0.0);
    }
    wbuf.resize(ROW_BLOCK * n, 0.0);
    for (start, rows, data) in d.parts_in(r0, r1) {
        let mut b0 = 0;
        while b0 < rows {
            let nb = ROW_BLOCK.min(rows - b0);
            if let Some(rows_data) = data.get(b0 * n, (b0 + nb) * n) {
                rows_data.widen_into(&mut wbuf[..nb * n]);
            }
            for (i, o) in out.chunks_exact_mut(n).take(t).enumerate() {
                let hrow = &h[i * hw + start + b0..i * hw + start + b0 + nb];
                let mut j = 0;
                while j + 4 <= nb {
                    let a = [hrow[j], hrow[j + 1], hrow[j + 2], hrow[j + 3]];
                    let wr = |q: usize| &wbuf[(j + q) * n..(j + q + 1) * n];
                    axpy4(o, a, [wr(0), wr(1), wr(2), wr(3)]);
                    j += 4;
                }
                for j in j..nb {
                    axpy(o, hrow[j], &wbuf[j * n..(j + 1) * n]);
                }
            }
            b0 += nb;
        }
    }
}

/// Columns of the output per pass of [`down_many_f16`]: [`DOWN_ROWS`] rows of this many f16
/// weights (8 KB) and every input's piece of the output stay in L1 while the inputs are added.
pub(super) const DOWN_COLS: usize = 512;

/// The down projection for a few inputs over f16 rows `[r0, r1)` (`out[i] += sum_r h[i, r] *
/// D[r]`, `out` zero on entry): [`DOWN_ROWS`] rows at a time, [`DOWN_COLS`] columns at a
/// time, every input's output piece updated while the rows' piece is in L1, the weights widened
/// in registers ([`axpy_rows_f16_slices`]); rows are added in increasing order, so every output
/// is bitwise the one-input path's. `false` when a weight is infinite or NaN (then `out` holds
/// garbage and the caller recomputes it exactly).
pub(super) fn down_many_f16(
    h: &[f32],
    hw: usize,
    t: usize,
    d: &Matrix<'_>,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) -> bool {
    let n = d.cols;
    for (start, rows, data) in d.parts_in(r0, r1) {
        let RowData::F16(w) = data else { return false };
        let mut j = 0;
        while j < rows {
            let step = match rows - j {
                left if left >= DOWN_ROWS => DOWN_ROWS,
                left if left >= 4 => 4,
                _ => 1,
            };
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + DOWN_COLS).min(n);
                let piece = |q: usize| &w[(j + q) * n + c0..(j + q) * n + c1];
                for (i, o) in out.chunks_exact_mut(n.max(1)).take(t).enumerate() {
                    let a = &h[i * hw + start + j..i * hw + start + j + step];
                    let y = &mut o[c0..c1];
                    let finite = match step {
                        DOWN_ROWS => axpy_rows_f16_slices::<DOWN_ROWS>(
                            y,
                            std::array::from_fn(|q| a[q]),
                            std::array::from_fn(piece),
                        ),
                        4 => axpy_rows_f16_slices::<4>(y, std::array::from_fn(|q| a[q]), std::array::from_fn(piece)),
                        _ => axpy_rows_f16_slices::<1>(y, [a[0]], [piece(0)]),
                    };
                    if !finite {
                        return false;
                    }
                }
                c0 = c1;
            }
            j += step;
        }
    }
    true
}

/// Rows of the down projection added per pass over the output in the one-input path: the
/// output chunk is loaded and stored once per `DOWN_ROWS` rows instead of once per row, and
/// the rows are read straight from the mapping (`DOWN_ROWS` sequential streams).
pub(super) const DOWN_ROWS: usize = 8;

/// The one-input down projection over rows `[r0, r1)` (`out += sum_r h[r] * D[r]`, `out`
/// zero on entry), reading f16 rows in place, [`DOWN_ROWS`] at a time; the same operations
/// in the same order as the exact path of [`down_rows`]. Returns `false` when a weight is
/// infinite or NaN (then `out` holds garbage and the caller recomputes it exactly).
pub(super) fn down_one_fast(h: &[f32], d: &Matrix<'_>, r0: usize, r1: usize, out: &mut [f32]) -> bool {
    let n = d.cols;
    for (start, rows, data) in d.parts_in(r0, r1) {
        let hrow = &h[start..start + rows];
        match data {
            RowData::F32(w) => {
                let mut j = 0;
                while j + 4 <= rows {
                    let a = [hrow[j], hrow[j + 1], hrow[j + 2], hrow[j + 3]];
                    let r = |q: usize| &w[(j + q) * n..(j + q + 1) * n];
                    axpy4(out, a, [r(0), r(1), r(2), r(3)]);
                    j += 4;
                }
                for (j, &a) in hrow.iter().enumerate().skip(j) {
                    axpy(out, a, &w[j * n..(j + 1) * n]);
                }
            }
            RowData::F16(w) => {
                let mut j = 0;
                while j < rows {
                    let (step, finite) = match rows - j {
                        left if left >= DOWN_ROWS => {
                            (DOWN_ROWS, axpy_rows_f16::<DOWN_ROWS>(out, &hrow[j..], &w[j * n..]))
                        }
                        left if left >= 4 => (4, axpy_rows_f16::<4>(out, &hrow[j..], &w[j * n..])),
                        _ => (1, axpy_rows_f16::<1>(out, &hrow[j..], &w[j * n..])),
                    };
                    if !finite {
                        return false;
                    }
                    j += step;
                }
            }
            // Dequantised by the caller's exact path.
            RowData::Quant(..) => return false,
        }
    }
    true
}

/// `out = h @ D` for `t` inputs: `h` is `[t, d.rows]`, `D` is `[d.rows, d.cols]` stored by
/// rows (the transposed down projection: one contiguous row per neuron), `out` is
/// `[t, d.cols]`. Summation order: see [`DOWN_GROUP`].
pub(crate) fn matmul_down(h: &[f32], t: usize, d: &Matrix<'_>, out: &mut [f32], threads: usize) {
    debug_assert_eq!(h.len(), t * d.rows, "matmul_down input");
    debug_assert_eq!(out.len(), t * d.cols, "matmul_down output");
    let (rows, n, hw) = (d.rows, d.cols, d.rows);
    let n_groups = rows.div_ceil(DOWN_GROUP).max(1);
    let group = |g: usize| (g * DOWN_GROUP, ((g + 1) * DOWN_GROUP).min(rows));
    let threads = threads_for(t.saturating_mul(rows).saturating_mul(n), threads);
    #[cfg(target_arch = "x86_64")]
    if t >= TILED_MIN_T && super::tiled::applies(n) {
        // A prefill batch on AVX-512: register tiles, split across threads by output columns
        // (each thread widens only its columns' weights, once for every input).
        let pieces = threads.min(n / QK).max(1);
        par_columns(out, t, n, threads, pieces, QK, |s, e, chunk, ld| {
            super::tiled::down_tiled(h, t, d, s, e, chunk, ld)
        });
        return;
    }
    if t > DOWN_SPLIT_GROUPS_MAX_T || n_groups == 1 || threads == 1 {
        // Each thread: a range of inputs, every group in order.
        // Every item reads all the weights: as few items as threads.
        par_slabs(out, n, threads.min(t), threads.min(t), |t0, slab| {
            let tt = slab.len() / n.max(1);
            let hs = &h[t0 * hw..(t0 + tt) * hw];
            let mut p = vec![0.0f32; if n_groups > 1 { tt * n } else { 0 }];
            let mut wbuf = Vec::new();
            for g in 0..n_groups {
                let (r0, r1) = group(g);
                if g == 0 {
                    slab.fill(0.0);
                    down_rows(hs, hw, tt, d, r0, r1, slab, &mut wbuf);
                } else {
                    p.fill(0.0);
                    down_rows(hs, hw, tt, d, r0, r1, &mut p, &mut wbuf);
                    add_assign(slab, &p);
                }
            }
        });
        return;
    }
    // Few inputs: each thread sums its own groups (reading only its weight rows), then the
    // partial sums are added in group order.
    let mut partials = vec![0.0f32; n_groups * t * n];
    par_slabs(&mut partials, t * n, threads.min(n_groups), n_groups, |g0, slab| {
        let mut wbuf = Vec::new();
        for (k, p) in slab.chunks_exact_mut(t * n).enumerate() {
            let (r0, r1) = group(g0 + k);
            down_rows(h, hw, t, d, r0, r1, p, &mut wbuf);
        }
    });
    out.copy_from_slice(&partials[..t * n]);
    for p in partials.chunks_exact(t * n).skip(1) {
        add_assign(out, p);
    }
}
