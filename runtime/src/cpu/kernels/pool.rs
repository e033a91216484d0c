//! Work distribution: the persistent worker pool and the helpers that split a kernel's items
//! between threads. No sum is ever split between threads (see the parent module).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Below this many multiply-adds a kernel runs on the calling thread only: handing work to
/// the worker threads and waiting for them costs microseconds (tens when a worker sleeps).
/// 2^21: a one-token 512 x 2048 f16 product (the size of the 1B model's k and v projections)
/// measured 19 GB/s on one thread and 14 on two with the earlier 8-lane dot product
/// (`kernel_speed`, release, AVX2). A decode step's k and v now run with q as one hand-off
/// ([`matmul_many`](super::matmul::matmul_many)), so this threshold no longer keeps them on one thread.
pub(crate) const PAR_MIN_WORK: usize = 1 << 21;

/// Splits `[0, n)` into at most `parts` contiguous ranges whose starts are multiples of `align`.
pub(super) fn split_ranges(n: usize, parts: usize, align: usize) -> Vec<(usize, usize)> {
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
pub(super) fn threads_for(work: usize, threads: usize) -> usize {
    if work < PAR_MIN_WORK {
        1
    } else {
        threads.clamp(1, work / (PAR_MIN_WORK / 2))
    }
}

/// Work items per thread in the parallel kernels: threads take items from a shared queue, so
/// faster cores (big.LITTLE) or cores not busy with other processes take more of them.
pub(super) const ITEMS_PER_THREAD: usize = 4;
/// Weight bytes per work item of a one-input product, when that gives more items than
/// [`ITEMS_PER_THREAD`]: an item then takes tens of microseconds, so the threads finish
/// within about that of each other (the LM head alone is hundreds of megabytes).
pub(super) const ITEM_BYTES: usize = 256 << 10;
/// How long the calling thread polls for the workers' last items before blocking: sleeping
/// and being woken costs tens of microseconds (more in virtual machines), and the last item
/// usually ends sooner.
pub(super) const SPIN_WAIT: std::time::Duration = std::time::Duration::from_micros(200);

/// The persistent worker pool for `threads` threads (`threads` workers), created on first use
/// and kept for the life of the process, one per thread count asked for. `None` when the
/// pool cannot be created (the kernels then spawn scoped threads).
///
/// Workers stay alive between products: a decode step runs ~7 products per layer, and
/// spawning threads for each cost tens of microseconds apiece, a large share of a step.
pub(super) fn worker_pool(threads: usize) -> Option<Arc<rayon_core::ThreadPool>> {
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
pub(super) fn run_dynamic<T: Send, F: Fn(T) + Sync>(items: Vec<T>, threads: usize, f: F) {
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
pub(super) fn par_columns<F>(out: &mut [f32], t: usize, n: usize, threads: usize, pieces: usize, align: usize, f: F)
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

/// Splits `out` (whole units of `chunk` elements) into at most `pieces` contiguous slabs and
/// runs `f(first_unit, slab)` on each, on up to `threads` threads.
pub(super) fn par_slabs<F>(out: &mut [f32], chunk: usize, threads: usize, pieces: usize, f: F)
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
