//! Fast f32 kernels of the CPU engine (the plain versions they are tested against are in
//! [`super::reference`]).
//!
//! Determinism: every output element is computed by the same sequence of f32 operations
//! whatever the batch size (1 token or a prefill batch) and whatever the thread count, so
//! batched prefill, token-by-token decode and any `with_threads(n)` agree bitwise:
//!
//! - dot products use [`LANES`] partial sums, element `k` going to lane `k % LANES` in
//!   increasing `k`, reduced by [`reduce`] in a fixed tree; the batched micro-kernel keeps
//!   exactly that order per (token, row);
//! - `x @ W^T` is split across threads by output rows, the down projection by output columns,
//!   attention by (token, head): no sum is ever split between threads.
//!
//! The loops are plain Rust written to auto-vectorise (fixed-size lane arrays, no bounds
//! checks in the inner loops, no `unsafe`, no run-time dispatch), so their speed follows the
//! build's target features: NEON on aarch64 (phones) is the baseline; the workspace's desktop
//! x86-64 builds target `x86-64-v3` (AVX2, FMA, F16C; `.cargo/config.toml`), where they run
//! 1.2-1.7x faster per core than in a baseline SSE2 build (`kernel_speed`).
//! [`crate::cpu::simd_features`] names the features of the running build.
//!
//! f16 weights: a one-input product (decode) never materialises f32 rows. It reads each f16's
//! bits as an f32 scaled by `2^-112` ([`f16_bits_unscaled`]: a shift and a mask) and folds the
//! `2^112` into the input, which is scaled once per call: `(x * 2^112) * (w / 2^112)` is the
//! same real number as `x * w`, rounded once, so the result is bitwise the product with the
//! exactly widened weight, at about a third of the instructions of a separate conversion. The
//! scaling is exact while `|x| < 2^16` ([`PRESCALE_LIMIT`]); larger inputs multiply each
//! weight by `2^112` instead (still exact). Infinite or NaN weights are detected on the way
//! (the running maximum of the exponent bits) and the row is recomputed with exactly widened
//! weights, as the batched paths always use. (This relies on IEEE
//! subnormals, the default on x86-64 and aarch64: a host that sets flush-to-zero would flush
//! the scaled subnormal weights; `f16_paths_equal_widened_f32_bitwise` checks it.)
//!
//! The one-input down projection adds [`DOWN_ROWS`] f16 rows per pass over its output chunk
//! (a register block of `y`), reading the rows in place. When the build has f16 conversion
//! instructions ([`HW_F16`]: x86-64 with F16C, as in `x86-64-v3` builds) both one-input
//! products widen the weights exactly instead (one conversion per vector, no infinity/NaN
//! check): same values, same order. Within one build, every path computes the same sequence
//! of f32 operations.
//!
//! Threads: the parallel kernels hand items to a persistent pool of workers
//! ([`worker_pool`]) rather than spawning threads per product.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;

use super::weights::{f16_bits_unscaled, Matrix, RowData, F16_SCALE};

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
const HW_F16: bool = cfg!(all(any(target_arch = "x86", target_arch = "x86_64"), target_feature = "f16c"));
/// f16 elements widened at a time by the exact fallback of the one-input paths (a multiple
/// of [`LANES`]): the widened chunk stays in L1 while it is consumed.
const CONVERT_CHUNK: usize = 256;
/// Inputs of smaller magnitude than this can be multiplied by [`F16_SCALE`] (`2^112`)
/// without overflowing f32 (whose largest finite value is just below `2^128`).
const PRESCALE_LIMIT: f32 = 65536.0;
/// f16 bits (sign cleared) at or above this have an all-ones exponent: infinity or NaN.
const F16_NON_FINITE: i16 = 0x7c00;
/// Rows widened at a time in the batched paths.
const ROW_BLOCK: usize = 8;
/// Tokens per micro-kernel call in the batched `x @ W^T`.
const TOKEN_BLOCK: usize = 2;
/// Below this many multiply-adds a kernel runs on the calling thread only: handing work to
/// the worker threads and waiting for them costs microseconds (tens when a worker sleeps).
/// 2^21: a one-token 512 x 2048 f16 product (the size of the 1B model's k and v projections)
/// measured 19 GB/s on one thread and 14 on two with the earlier 8-lane dot product
/// (`kernel_speed`, release, AVX2). A decode step's k and v now run with q as one hand-off
/// ([`matmul_many`]), so this threshold no longer keeps them on one thread.
pub(crate) const PAR_MIN_WORK: usize = 1 << 21;

#[inline(always)]
fn mul_add_lanes(acc: &mut [f32; LANES], x: &[f32; LANES], w: &[f32; LANES]) {
    for i in 0..LANES {
        acc[i] += x[i] * w[i];
    }
}

/// Adds `x[k] * w[k]` to lane `k % LANES`, for `k` in increasing order; `x` and `w` must start
/// at a multiple of [`LANES`] of the full vectors for the lane assignment to be global.
#[inline(always)]
fn accumulate(acc: &mut [f32; LANES], x: &[f32], w: &[f32]) {
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        if let (Ok(a), Ok(b)) = (<&[f32; LANES]>::try_from(a), <&[f32; LANES]>::try_from(b)) {
            mul_add_lanes(acc, a, b);
        }
    }
    for ((s, a), b) in acc.iter_mut().zip(xr).zip(wr) {
        *s += a * b;
    }
}

/// [`accumulate`] for [`TOKEN_BLOCK`] inputs against one weight row at once (the weight row
/// is loaded once per chunk), keeping the per-(input, row) order of [`accumulate`].
#[inline(always)]
fn accumulate_block(acc: &mut [[f32; LANES]; TOKEN_BLOCK], x: [&[f32]; TOKEN_BLOCK], w: &[f32]) {
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
            *s += xv * wv;
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
fn prescale(x: &[f32]) -> Option<Vec<f32>> {
    x.iter().all(|v| v.abs() < PRESCALE_LIMIT).then(|| x.iter().map(|v| v * F16_SCALE).collect())
}

/// [`dot`] of `x` with an f16 row given as bits, without widening the row: `x` is the input
/// times `2^112` when `PRESCALED`, the input itself otherwise. Bitwise equal to [`dot`] with
/// the exactly widened row, or `None` when the row holds an infinity or a NaN.
// Not inlined: compiled on its own, the 8-lane loop vectorises (17 GB/s per core with AVX2);
// inlined into `matmul_rows`, release builds left it scalar (2.5-3 GB/s).
#[inline(never)]
fn dot_f16_bits<const PRESCALED: bool>(x: &[f32], w: &[u16]) -> Option<f32> {
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
                acc[i] += a[i] * weight(b[i]);
            }
        }
    }
    for (((s, t), &a), &b) in acc.iter_mut().zip(top.iter_mut()).zip(xr).zip(wr) {
        *t = (*t).max((b & 0x7fff) as i16);
        *s += a * weight(b);
    }
    top.iter().all(|&t| t < F16_NON_FINITE).then(|| reduce(&acc))
}

/// [`dot`] of `x` with an f16 row, widened exactly by `half`'s conversion: for builds with
/// f16 conversion instructions ([`HW_F16`]), where the loop compiles to vector conversions,
/// multiplies and adds. Bitwise equal to [`dot`] with the widened row (infinities and NaNs
/// included).
// Not inlined, for the reason given at `dot_f16_bits`.
#[inline(never)]
fn dot_f16_exact(x: &[f32], w: &[f16]) -> f32 {
    let n = x.len().min(w.len());
    let (x, w) = (&x[..n], &w[..n]);
    let mut acc = [0.0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        if let (Ok(a), Ok(b)) = (<&[f32; LANES]>::try_from(a), <&[f16; LANES]>::try_from(b)) {
            for i in 0..LANES {
                acc[i] += a[i] * b[i].to_f32();
            }
        }
    }
    for ((s, &a), &b) in acc.iter_mut().zip(xr).zip(wr) {
        *s += a * b.to_f32();
    }
    reduce(&acc)
}

/// [`dot`] against a row stored as f16 or f32; `xs` is [`prescale`]`(x)` when it exists.
/// f16 rows are read without widening; a row with an infinity or a NaN is widened exactly,
/// chunk by chunk (bitwise equal to widening the whole row first).
#[inline]
fn dot_row(x: &[f32], xs: Option<&[f32]>, w: RowData<'_>) -> f32 {
    match w {
        RowData::F32(w) => dot(x, w),
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
        *yv += a * xv;
    }
}

/// Four [`axpy`]s in one pass over `y`: `y = (((y + a0 x0) + a1 x1) + a2 x2) + a3 x3`
/// elementwise, bitwise equal to the four calls in sequence but loading and storing `y` once.
#[inline(always)]
fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    let n = y.len().min(x[0].len()).min(x[1].len()).min(x[2].len()).min(x[3].len());
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for ((((yv, v0), v1), v2), v3) in y[..n].iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
        *yv = (((*yv + a[0] * v0) + a[1] * v1) + a[2] * v2) + a[3] * v3;
    }
}

/// `y += x` elementwise.
pub(crate) fn add_assign(y: &mut [f32], x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += xv;
    }
}

/// Rows `[r0, r1)` of `x @ W^T` for `t` inputs: `out[i * ld + (r - r0)] = x[i] . W[r]`;
/// `xs` is [`prescale`]`(x)` when `t == 1` and it exists.
#[allow(clippy::too_many_arguments)]
fn matmul_rows(
    x: &[f32],
    xs: Option<&[f32]>,
    t: usize,
    w: &Matrix<'_>,
    r0: usize,
    r1: usize,
    out: &mut [f32],
    ld: usize,
) {
    let cols = w.cols;
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
    let mut wbuf = vec![0.0f32; ROW_BLOCK * cols];
    for (start, rows, data) in w.parts_in(r0, r1) {
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

/// Splits `[0, n)` into at most `parts` contiguous ranges whose starts are multiples of `align`.
fn split_ranges(n: usize, parts: usize, align: usize) -> Vec<(usize, usize)> {
    let parts = parts.max(1);
    let per = n.div_ceil(parts).div_ceil(align.max(1)) * align.max(1);
    let mut out = Vec::with_capacity(parts);
    let mut s = 0;
    while s < n {
        let e = (s + per.max(1)).min(n);
        out.push((s, e));
        s = e;
    }
    out
}

/// Threads worth using for `work` multiply-adds.
fn threads_for(work: usize, threads: usize) -> usize {
    if work < PAR_MIN_WORK {
        1
    } else {
        threads.clamp(1, work / (PAR_MIN_WORK / 2))
    }
}

/// Work items per thread in the parallel kernels: threads take items from a shared queue, so
/// faster cores (big.LITTLE) or cores not busy with other processes take more of them.
const ITEMS_PER_THREAD: usize = 4;
/// Weight bytes per work item of a one-input product, when that gives more items than
/// [`ITEMS_PER_THREAD`]: an item then takes tens of microseconds, so the threads finish
/// within about that of each other (the LM head alone is hundreds of megabytes).
const ITEM_BYTES: usize = 256 << 10;
/// How long the calling thread polls for the workers' last items before blocking: sleeping
/// and being woken costs tens of microseconds (more in virtual machines), and the last item
/// usually ends sooner.
const SPIN_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

/// The persistent worker pool for `threads` threads (`threads` workers), created on first use
/// and kept for the life of the process, one per thread count asked for. `None` when the
/// pool cannot be created (the kernels then spawn scoped threads).
///
/// Workers stay alive between products: a decode step runs ~7 products per layer, and
/// spawning threads for each cost tens of microseconds apiece, a large share of a step.
fn worker_pool(threads: usize) -> Option<Arc<rayon_core::ThreadPool>> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon_core::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().ok()?;
    if let Some((_, pool)) = pools.iter().find(|(n, _)| *n == threads) {
        return Some(Arc::clone(pool));
    }
    let pool = rayon_core::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("matformer-cpu-{threads}-{i}"))
        .build()
        .ok()?;
    let pool = Arc::new(pool);
    pools.push((threads, Arc::clone(&pool)));
    Some(pool)
}

/// Runs `f` on a worker of the pool for `threads` threads (on the calling thread when
/// `threads <= 1` or the pool cannot be created), and returns its result. The parallel
/// kernels that `f` calls (with at most `threads`) then split their items between that worker
/// and the others, and when one of the others has not picked its share up by the time the
/// items run out (asleep, or descheduled by another process), the first worker takes the
/// share back and runs it instead of waiting: one hand-off per call of `with_workers` (a
/// forward pass) instead of one per product.
pub(crate) fn with_workers<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads <= 1 {
        return f();
    }
    match worker_pool(threads) {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Runs `f(item)` for every item on up to `threads` threads (the calling thread included),
/// each thread taking the next item from a shared queue until it is empty.
fn run_dynamic<T: Send, F: Fn(T) + Sync>(items: Vec<T>, threads: usize, f: F) {
    let threads = threads.min(items.len());
    if threads <= 1 {
        items.into_iter().for_each(f);
        return;
    }
    let queue = Mutex::new(items.into_iter());
    // The lock is never held while `f` runs, so it cannot be poisoned by a panicking item;
    // a poisoned queue just ends the loop (the panic itself propagates from the scope).
    let next = || queue.lock().ok().and_then(|mut q| q.next());
    let work = || {
        while let Some(item) = next() {
            f(item);
        }
    };
    if rayon_core::current_thread_index().is_some() {
        // On a pool's worker (inside `with_workers`, whose pool has at least `threads`
        // workers; or a caller's own pool): share the items with that pool's workers, and
        // run here the shares none of them picked up by the time the items run out. Never a
        // second pool from inside one, whatever thread count `threads_for` chose.
        rayon_core::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(|_| work());
            }
            work();
        });
        return;
    }
    match worker_pool(threads) {
        Some(pool) => {
            let running = AtomicUsize::new(threads - 1);
            let running = &running;
            pool.in_place_scope(|scope| {
                for _ in 1..threads {
                    scope.spawn(move |_| {
                        work();
                        running.fetch_sub(1, Ordering::Release);
                    });
                }
                work();
                let start = std::time::Instant::now();
                while running.load(Ordering::Acquire) > 0 && start.elapsed() < SPIN_WAIT {
                    std::hint::spin_loop();
                }
            })
        }
        None => std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        }),
    }
}

/// Runs `f(s, e, out_chunk, ld)` over at most `pieces` column ranges `[s, e)` of a row-major
/// `[t, n]` output in parallel. With one input row the chunks are disjoint slices of `out`
/// (`ld = e - s`); otherwise each range fills a private `[t, e - s]` buffer copied into place
/// afterwards.
#[allow(clippy::too_many_arguments)]
fn par_columns<F>(out: &mut [f32], t: usize, n: usize, threads: usize, pieces: usize, align: usize, f: F)
where
    F: Fn(usize, usize, &mut [f32], usize) + Sync,
{
    if threads <= 1 {
        f(0, n, out, n);
        return;
    }
    let ranges = split_ranges(n, pieces, align);
    if t == 1 {
        let mut items = Vec::with_capacity(ranges.len());
        let mut rest: &mut [f32] = out;
        for &(s, e) in &ranges {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(e - s);
            rest = tail;
            items.push((s, e, chunk));
        }
        run_dynamic(items, threads, |(s, e, chunk)| f(s, e, chunk, e - s));
        return;
    }
    let mut bufs: Vec<Vec<f32>> = ranges.iter().map(|&(s, e)| vec![0.0; t * (e - s)]).collect();
    let items: Vec<_> = ranges.iter().zip(bufs.iter_mut()).collect();
    run_dynamic(items, threads, |(&(s, e), buf)| f(s, e, buf, e - s));
    for (&(s, e), buf) in ranges.iter().zip(&bufs) {
        let w = e - s;
        for i in 0..t {
            out[i * n + s..i * n + e].copy_from_slice(&buf[i * w..(i + 1) * w]);
        }
    }
}

/// `out[i, r] = x[i] . W[r]` for `t` inputs of `w.cols` elements: `x` is `[t, cols]`, `out`
/// is `[t, rows]`. Weight rows are read once for the whole batch.
pub(crate) fn matmul(x: &[f32], t: usize, w: &Matrix<'_>, out: &mut [f32], threads: usize) {
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
        let elem = match w.parts.first().map(|p| p.data) {
            Some(RowData::F16(_)) => 2,
            _ => 4,
        };
        pieces = pieces.max(n.saturating_mul(w.cols).saturating_mul(elem) / ITEM_BYTES);
    }
    par_columns(out, t, n, threads, pieces, ROW_BLOCK, |s, e, chunk, ld| matmul_rows(x, xs, t, w, s, e, chunk, ld));
}

/// [`matmul`] of one input against several matrices of the same width (`outs[i] = x @ W_i^T`):
/// a decode step's q, k and v projections, or its FFN gate and up. With one input the rows of
/// all the matrices are shared among the threads in one hand-off, so small products (k and v:
/// 512 x 2048 on the 1B model, below [`PAR_MIN_WORK`] alone) run on every thread and the step
/// waits for the workers once instead of once per matrix. Each output row is the same
/// [`dot_row`] as in [`matmul`], so the results are bitwise those of separate calls. With
/// several inputs (prefill, compute-bound) it is separate [`matmul`] calls.
pub(crate) fn matmul_many(x: &[f32], t: usize, products: &mut [(&Matrix<'_>, &mut [f32])], threads: usize) {
    let cols = products.first().map_or(0, |(w, _)| w.cols);
    if t != 1 || products.iter().any(|(w, _)| w.cols != cols) {
        for (w, out) in products.iter_mut() {
            matmul(x, t, w, out, threads);
        }
        return;
    }
    let x = &x[..cols.min(x.len())];
    let rows: usize = products.iter().map(|(w, _)| w.rows).sum();
    let threads = threads_for(rows.saturating_mul(cols), threads).min(rows.div_ceil(ROW_BLOCK).max(1));
    let f16_rows = products.iter().any(|(w, _)| w.parts.iter().any(|p| matches!(p.data, RowData::F16(_))));
    let xs = if f16_rows && !HW_F16 { prescale(x) } else { None };
    let xs = xs.as_deref();
    // Items of about ITEM_BYTES of weights (f16 counted as 2 bytes per element, f32 as 4), at
    // least ITEMS_PER_THREAD per thread over all the matrices, each within one matrix.
    let bytes: usize = products
        .iter()
        .map(|(w, _)| {
            let elem = if w.parts.iter().any(|p| matches!(p.data, RowData::F32(_))) { 4 } else { 2 };
            w.rows.saturating_mul(w.cols).saturating_mul(elem)
        })
        .sum();
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
    run_dynamic(items, threads, |(w, s, e, chunk)| matmul_rows(x, xs, 1, w, s, e, chunk, e - s));
}

/// Neurons per partial sum of the down projection. Fixed (not derived from the thread count
/// or the width) so that every output is the same sequence of operations whatever the batch,
/// the threads or the submodel: `out = ((p_0 + p_1) + p_2) + ...` where `p_g` sums neurons
/// `[g * DOWN_GROUP, (g + 1) * DOWN_GROUP)` in increasing order.
const DOWN_GROUP: usize = 256;
/// Up to this many inputs the down projection splits neuron groups across threads (each
/// thread reads only its own weight rows); beyond it, it splits the inputs (compute-bound).
const DOWN_SPLIT_GROUPS_MAX_T: usize = 8;

/// `out[i] = sum_{r in [r0, r1)} h[i, r] * D[r]` for `t` inputs (`h` is `[t, hw]`, `out` is
/// `[t, D.cols]`, zero on entry), `r` increasing.
#[allow(clippy::too_many_arguments)]
fn down_rows(
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
    if t == 1 {
        if down_one_fast(&h[..hw.min(h.len())], d, r0, r1, out) {
            return;
        }
        // A weight is infinite or NaN: start again from zero with exactly widened weights.
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

/// Rows of the down projection added per pass over the output in the one-input path: the
/// output chunk is loaded and stored once per `DOWN_ROWS` rows instead of once per row, and
/// the rows are read straight from the mapping (`DOWN_ROWS` sequential streams).
const DOWN_ROWS: usize = 8;

/// `y = (...((y + a[0] w[0]) + a[1] w[1]) ...) + a[R-1] w[R-1]` elementwise, for `R` f16 rows
/// stored one after the other in `w` (`R * y.len()` elements), given as bits and read without
/// widening them: `a` is the coefficients times `2^112` when `PRESCALED`, the coefficients
/// themselves otherwise. Bitwise equal to `R` [`axpy`]s with the exactly widened rows when it
/// returns `true`; `false` means a row holds an infinity or a NaN (and `y` holds garbage).
///
/// The column loop works on [`LANES`]-wide chunks so that the compiler keeps a chunk of `y`
/// in registers while the `R` rows are added (an `R`-row register block).
#[inline(always)]
fn axpy_rows_f16_bits<const R: usize, const PRESCALED: bool>(y: &mut [f32], a: [f32; R], w: &[u16]) -> bool {
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
                        v[i] += ar * weight(b[i]);
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
            v += ar * weight(b);
        }
        *yv = v;
    }
    top_rest < F16_NON_FINITE && top.iter().all(|&t| t < F16_NON_FINITE)
}

/// [`axpy_rows_f16_bits`] with exactly widened weights (`half`'s conversion): used when the
/// build has f16 conversion instructions ([`HW_F16`]), where the compiler turns the column
/// loop into vector conversions, multiplies and adds (no infinity/NaN check needed).
#[inline(always)]
fn axpy_rows_f16_exact<const R: usize>(y: &mut [f32], a: [f32; R], w: &[f16]) {
    let n = y.len();
    let Some(w) = w.get(..R * n) else {
        return;
    };
    let rows: [&[f16]; R] = std::array::from_fn(|r| &w[r * n..(r + 1) * n]);
    for (c, yv) in y.iter_mut().enumerate() {
        let mut v = *yv;
        for (row, &ar) in rows.iter().zip(&a) {
            v += ar * row[c].to_f32();
        }
        *yv = v;
    }
}

/// `R` rows of f16 weights added into `y` (`y += sum_r a[r] * w[r]`, rows in order); `false`
/// when a weight is infinite or NaN (see [`axpy_rows_f16_bits`]).
#[inline(always)]
fn axpy_rows_f16<const R: usize>(y: &mut [f32], a: &[f32], w: &[f16]) -> bool {
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

/// The one-input down projection over rows `[r0, r1)` (`out += sum_r h[r] * D[r]`, `out`
/// zero on entry), reading f16 rows in place, [`DOWN_ROWS`] at a time; the same operations
/// in the same order as the exact path of [`down_rows`]. Returns `false` when a weight is
/// infinite or NaN (then `out` holds garbage and the caller recomputes it exactly).
fn down_one_fast(h: &[f32], d: &Matrix<'_>, r0: usize, r1: usize, out: &mut [f32]) -> bool {
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

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = dot(x, x) / x.len().max(1) as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * r * wv;
    }
}

/// LayerNorm: `out = (x - mean) / sqrt(var + eps) * w + b` (biased variance).
pub(crate) fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len().max(1) as f32;
    let mean = sum(x) / n;
    for (o, xv) in out.iter_mut().zip(x) {
        *o = xv - mean;
    }
    let var = dot(out, out) / n;
    let r = 1.0 / (var + eps).sqrt();
    for ((o, wv), bv) in out.iter_mut().zip(w).zip(b) {
        *o = *o * r * wv + bv;
    }
}

/// Rotates `x` (one head, `cos.len() * 2` elements) in place with the "rotate_half" pairing
/// `(i, i + half)`: `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`.
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x.split_at_mut(half);
    for (((x1, x2), c), s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (v1, v2) = (*x1, *x2);
        *x1 = v1 * c - v2 * s;
        *x2 = v2 * c + v1 * s;
    }
}

/// `cos` and `sin` of `pos * inv_freq[i]` (computed in f32, as PyTorch does).
pub(crate) fn rope_angles(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    let p = pos as f32;
    for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos();
        *s = a.sin();
    }
}

/// Causal attention of one query head over `n` cached positions: `keys` and `values` are the
/// layer's caches (`[pos, kv_dim]`), the head's slice starting at `off`. `scores` needs `n`
/// elements of scratch; `out` gets `head_dim` elements.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    kv_dim: usize,
    off: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let scores = &mut scores[..n];
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * kv_dim + off..j * kv_dim + off + hd];
        *s = dot(q, k) * scale;
        max = max.max(*s);
    }
    let mut total = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    out.fill(0.0);
    for (j, s) in scores.iter().enumerate() {
        let v = &values[j * kv_dim + off..j * kv_dim + off + hd];
        axpy(out, *s / total, v);
    }
}

/// SiLU: `x * sigmoid(x)`.
#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// tanh-approximated GELU (PyTorch `approximate="tanh"`).
#[inline]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// Splits `out` (whole units of `chunk` elements) into at most `pieces` contiguous slabs and
/// runs `f(first_unit, slab)` on each, on up to `threads` threads.
fn par_slabs<F>(out: &mut [f32], chunk: usize, threads: usize, pieces: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let chunk = chunk.max(1);
    if threads <= 1 {
        f(0, out);
        return;
    }
    let units = out.len() / chunk;
    let mut items = Vec::new();
    let mut rest: &mut [f32] = out;
    for (s, e) in split_ranges(units, pieces, 1) {
        let (slab, tail) = std::mem::take(&mut rest).split_at_mut((e - s) * chunk);
        rest = tail;
        items.push((s, slab));
    }
    run_dynamic(items, threads, |(s, slab)| f(s, slab));
}

/// Parallel map over the `out.len() / chunk` equal-size chunks of `out`:
/// `f(unit_index, out_chunk, scratch)`, each thread with its own `scratch_len` scratch; runs
/// on one thread below [`PAR_MIN_WORK`] multiply-adds of `work`.
pub(crate) fn par_units<F>(out: &mut [f32], chunk: usize, work: usize, threads: usize, scratch_len: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let chunk = chunk.max(1);
    let units = out.len() / chunk;
    let threads = threads_for(work, threads).min(units.max(1));
    par_slabs(out, chunk, threads, threads * ITEMS_PER_THREAD, |u0, slab| {
        let mut scratch = vec![0.0f32; scratch_len];
        for (k, c) in slab.chunks_exact_mut(chunk).enumerate() {
            f(u0 + k, c, &mut scratch);
        }
    });
}

#[cfg(test)]
mod tests {
    //! Property tests: each fast kernel against its scalar reference on random shapes and
    //! values (named tolerances), plus the bitwise batch/thread invariances.

    use half::f16;

    use super::super::reference;
    use super::super::tolerance::Tolerance;
    use super::super::weights::{Matrix, Part, RowData};
    use super::*;

    /// SplitMix64: a tiny deterministic generator for test data.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [0, n).
        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n.max(1) as u64) as usize
        }
        /// Uniform in [-1, 1).
        fn f(&mut self) -> f32 {
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
    struct TestMatrix {
        rows: usize,
        cols: usize,
        f32_data: Vec<f32>,
        f16_data: Vec<f16>,
        splits: Vec<usize>,
    }

    impl TestMatrix {
        fn new(rng: &mut Rng, rows: usize, cols: usize, use_f16: bool) -> TestMatrix {
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

        fn view(&self, use_f16: bool) -> Matrix<'_> {
            let parts = self
                .splits
                .windows(2)
                .map(|w| {
                    let (a, b) = (w[0] * self.cols, w[1] * self.cols);
                    Part {
                        first_row: w[0],
                        rows: w[1] - w[0],
                        data: if use_f16 {
                            RowData::F16(&self.f16_data[a..b])
                        } else {
                            RowData::F32(&self.f32_data[a..b])
                        },
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
}

#[cfg(test)]
mod speed {
    //! Micro-benchmarks (ignored): `cargo test -p matformer --release --lib speed -- --ignored --nocapture`.

    use std::time::Instant;

    use half::f16;

    use super::super::weights::{Matrix, Part, RowData};
    use super::*;

    fn bench(name: &str, bytes: usize, mut f: impl FnMut()) {
        f();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!("{name:>40}: {:8.3} ms  {:6.2} GB/s", best * 1e3, bytes as f64 / best / 1e9);
    }

    #[test]
    #[ignore = "benchmark"]
    fn kernel_speed() {
        let (rows, cols) = (32768usize, 2048usize);
        let w16: Vec<f16> =
            (0..rows * cols).map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
        let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let m16 = Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::F16(&w16) }] };
        let m32 = Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::F32(&w32) }] };
        let x: Vec<f32> = (0..cols * 64).map(|i| (i % 13) as f32 / 13.0).collect();
        let h: Vec<f32> = (0..rows * 64).map(|i| (i % 11) as f32 / 11.0).collect();
        let mut out = vec![0.0f32; rows * 64];
        let mut out2 = vec![0.0f32; cols * 64];
        bench("widen f16 rows (half)", rows * cols * 2, || {
            let mut buf = vec![0.0f32; cols];
            for r in w16.chunks_exact(cols) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(r, &mut buf);
                std::hint::black_box(&buf);
            }
        });
        bench("widen f16 rows (widen_f16)", rows * cols * 2, || {
            let mut buf = vec![0.0f32; cols];
            for r in w16.chunks_exact(cols) {
                for (o, h) in buf.iter_mut().zip(r) {
                    *o = super::super::weights::widen_f16(h.to_bits());
                }
                std::hint::black_box(&buf);
            }
        });
        // Small products, as in a decode step (k and v projections: 512 x 2048): the cost of
        // handing work to other threads shows here.
        let small = Matrix {
            rows: 512,
            cols,
            parts: vec![Part { first_row: 0, rows: 512, data: RowData::F16(&w16[..512 * cols]) }],
        };
        for threads in [1, 2] {
            bench(&format!("gemv f16 512x{cols} x64 th={threads}"), 64 * 512 * cols * 2, || {
                for _ in 0..64 {
                    matmul(&x[..cols], 1, &small, &mut out[..512], threads);
                }
            });
        }
        // The 1B model's FFN at full width (`ffn_up`: 8192 x 2048, `ffn_down_t`: 8192 neurons
        // x 2048): four different 8192-row slices per run, so that no run reads from the
        // last-level cache what the previous one left there.
        let slices: Vec<Matrix<'_>> = w16
            .chunks_exact(8192 * cols)
            .map(|s| Matrix { rows: 8192, cols, parts: vec![Part { first_row: 0, rows: 8192, data: RowData::F16(s) }] })
            .collect();
        for threads in [1, 2] {
            bench(&format!("gemv f16 8192x{cols} x4 th={threads}"), rows * cols * 2, || {
                for m in &slices {
                    matmul(&x[..cols], 1, m, &mut out[..8192], threads);
                }
            });
            bench(&format!("down f16 8192x{cols} x4 th={threads}"), rows * cols * 2, || {
                for m in &slices {
                    matmul_down(&h[..8192], 1, m, &mut out2[..cols], threads);
                }
            });
        }
        // A decode step's q, k and v products (2048, 512 and 512 rows) on ten distinct sets of
        // weights: one hand-off for the three (`matmul_many`) against three calls.
        let sets: Vec<[Matrix<'_>; 3]> = w16
            .chunks_exact(3072 * cols)
            .map(|s| {
                let m = |a: usize, b: usize| Matrix {
                    rows: b - a,
                    cols,
                    parts: vec![Part { first_row: 0, rows: b - a, data: RowData::F16(&s[a * cols..b * cols]) }],
                };
                [m(0, 2048), m(2048, 2560), m(2560, 3072)]
            })
            .collect();
        let qkv_bytes = sets.len() * 3072 * cols * 2;
        for round in 0..2 {
            bench(&format!("qkv 3 calls th=2 ({round})"), qkv_bytes, || {
                for [q, k, v] in &sets {
                    matmul(&x[..cols], 1, q, &mut out[..2048], 2);
                    matmul(&x[..cols], 1, k, &mut out[2048..2560], 2);
                    matmul(&x[..cols], 1, v, &mut out[2560..3072], 2);
                }
            });
            bench(&format!("qkv matmul_many th=2 ({round})"), qkv_bytes, || {
                for [q, k, v] in &sets {
                    let (oq, rest) = out[..3072].split_at_mut(2048);
                    let (ok, ov) = rest.split_at_mut(512);
                    matmul_many(&x[..cols], 1, &mut [(q, oq), (k, ok), (v, ov)], 2);
                }
            });
        }
        for threads in [1, 2] {
            bench(&format!("gemv f16 t=1 th={threads}"), rows * cols * 2, || {
                matmul(&x[..cols], 1, &m16, &mut out[..rows], threads)
            });
            bench(&format!("gemv f32 t=1 th={threads}"), rows * cols * 4, || {
                matmul(&x[..cols], 1, &m32, &mut out[..rows], threads)
            });
            bench(&format!("down f16 t=1 th={threads}"), rows * cols * 2, || {
                matmul_down(&h[..rows], 1, &m16, &mut out2[..cols], threads)
            });
            let flops = rows * cols * 2 * 64;
            let t = Instant::now();
            matmul(&x, 64, &m16, &mut out, threads);
            eprintln!(
                "{:>40}: {:.2} GFLOP/s",
                format!("matmul f16 t=64 th={threads}"),
                flops as f64 / t.elapsed().as_secs_f64() / 1e9
            );
            let t = Instant::now();
            matmul_down(&h, 64, &m16, &mut out2, threads);
            eprintln!(
                "{:>40}: {:.2} GFLOP/s",
                format!("down f16 t=64 th={threads}"),
                flops as f64 / t.elapsed().as_secs_f64() / 1e9
            );
        }
    }
}
